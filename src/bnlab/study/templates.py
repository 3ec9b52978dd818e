"""The report's words and layout: the glossary, the residual-block diagram, and the Jinja2 templates of
report.md (with PNG files beside it) and of the self-contained report.html.

The layout answers first: under the title, one line of scope and one card per claim (its answer in plain
words, its verdict badge, what the literature found); then BN's four steps on a trained channel; then one
section per claim (the answer, the figure that shows it, the evidence table, short paragraphs, and the
rule, the part-by-part account and the differences from the paper folded in ``<details>``); then the
glossary (:data:`GLOSSARY`, whose terms :func:`bnlab.study.report.link_glossary` links on first use) and
the appendix, which states once what was run (dataset, model, seeds, versions, hardware).

Claim text goes through ``md`` (Markdown) or ``rich`` (HTML) so `code` and references render as code and
links; every Markdown table is built by :func:`bnlab.study.report.md_cell` (pre-rendered as ``.markdown``).
Markdown has no ``<details>``: what HTML folds, report.md gives under bold run-in headings.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Term", "GLOSSARY", "BLOCK_SVG", "profile_time", "MARKDOWN", "HTML"]


@dataclass(frozen=True)
class Term:
    """A glossary entry: its slug (the anchor ``#gloss-<slug>``), its definition, and the regular
    expressions (case-insensitive) of the words that use it; each of these is linked where it first
    appears in the page (and first appears inside each folded block)."""

    slug: str
    definition: str
    forms: tuple[str, ...]


# term → definition (and the words that use it); the HTML and the Markdown both render this, in this order
GLOSSARY: dict[str, Term] = {
    "ICS (internal covariate shift)": Term(
        "ics", "The change in the distribution of a layer's inputs during training, as the layers before it are "
               "updated. Ioffe & Szegedy 2015 proposed BN to reduce it (claim 1 asks whether it does, and whether "
               "that is why BN helps).",
        (r"internal covariate shift", r"(?<!gradient )\bICS\b")),
    "gradient ICS": Term(
        "gradient-ics", "Santurkar et al. 2018's measure of ICS (their Definition 2.1): G is a layer's gradient, "
                        "G′ the same layer's gradient after the layers before it have taken their step. cos(G, G′) "
                        "near 1 means the earlier layers' updates barely changed what this layer should do: little "
                        "ICS.",
        (r"gradient ICS",)),
    "decade": Term(
        "decade", "A factor of 10 on a log10 scale: 1 decade is 10×, 0.6 decades about 4×, 1.43 decades about 27×. "
                  "Ratios of learning rates and of steps are compared in decades because they multiply.",
        (r"\bdecades?\b",)),
    "validated learning rate": Term(
        "validated-lr", "The learning rate an arm's validation accuracy chose from its grid (held-out training "
                        "data, never the test set). Each arm is compared at its own validated rate.",
        (r"\bvalidated (?:learning rates?|lrs?|rates?)\b",)),
    "threshold and margin": Term(
        "threshold", "Each part of a claim has a threshold its effect must clear to hold (the whole 95% interval "
                     "above it) and a smaller margin below which the effect counts as absent (the whole interval "
                     "below it). An interval that straddles either is undecided. Both were fixed in code before "
                     "any data existed.",
        (r"\bthresholds?\b", r"\bmargins?\b")),
    "arm": Term(
        "arm", "One of the variants a claim compares (BN, no normalization, SkipInit, Fixup, ghost BN, "
               "GroupNorm…), trained on the same seeds as the others.",
        (r"\barms?\b",)),
    "paired seed": Term(
        "paired", "The same seed in two arms: the same data order and the same initial weights (where the arms "
                  "share them). Effects are differences between arms seed by seed, which removes most of the "
                  "seed-to-seed noise.",
        (r"\bpaired\b",)),
    "SkipInit": Term(
        "skipinit", "De & Smith 2020: no normalization; a scalar α, initialized to 0, multiplies each residual "
                    "branch, so every block starts as the identity, as BN's scaling makes it nearly.",
        (r"\bSkipInit\b",)),
    "Fixup": Term(
        "fixup", "Zhang et al. 2019: no normalization; each residual branch's weights are scaled down with the "
                 "network's depth and its last layer starts at zero, with scalar biases and a multiplier.",
        (r"\bFixup\b",)),
    "ghost batch": Term(
        "ghost", "BN statistics computed over small sub-batches of a few examples instead of the whole batch "
                 "(Hoffer et al. 2017): the smaller the ghost batch, the noisier the statistics.",
        (r"\bghost[ -]batch(?:es)?\b", r"\bghost BN\b")),
    "look (sequential seeds)": Term(
        "look", "With sequential seeds a claim first runs a first block of seeds (its first look) and runs the "
                "next block only while a part is undecided, up to the last look. Each look's intervals are "
                "computed at a stricter level, so a false decision stays under 5% however the stopping goes.",
        (r"\bsequential seeds\b", r"\blook \d+ of \d+\b")),
    "setting": Term(
        "setting", "A dataset and network depth in which every claim is measured and judged. A profile may name "
                   "several; the report then gives each claim's verdict in each and its answer across them.",
        (r"\bsettings?\b",)),
}


def profile_time(description: str) -> str:
    """How long a profile takes, as its ``description`` states it: the text before its first ": "
    ("about 5 minutes on 2 idle CPU cores"); the whole description when it has none."""
    return description.split(": ", 1)[0].strip()


# Where BN sits in a residual block (inline in the HTML, figures/bn_in_block.svg beside report.md): the block
# of bnlab.models, top to bottom, the BN whose channel the step-by-step figure shows marked.
BLOCK_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 320 392" width="320" height="392" role="img"
 aria-labelledby="block-title" font-family="system-ui, sans-serif" font-size="13">
<title id="block-title">A residual block: conv, BN, ReLU, conv, BN, then the shortcut is added and a ReLU follows</title>
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">
<path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs>
<g stroke="#444" stroke-width="1.4" fill="none" marker-end="url(#arrow)">
<path d="M100,30 V52"/><path d="M100,82 V100"/><path d="M100,130 V148"/><path d="M100,178 V196"/>
<path d="M100,226 V244"/><path d="M100,274 V290"/><path d="M100,322 V340"/>
<path d="M160,16 H290 V306 H118"/></g>
<text x="100" y="22" text-anchor="middle">x (the residual stream)</text>
<g stroke="#444" stroke-width="1.2">
<rect x="50" y="54" width="100" height="28" rx="4" fill="#fff"/>
<rect x="50" y="100" width="100" height="30" rx="4" fill="#0072B2" stroke="#003d66" stroke-width="2"/>
<rect x="50" y="148" width="100" height="28" rx="4" fill="#fff"/>
<rect x="50" y="196" width="100" height="28" rx="4" fill="#fff"/>
<rect x="50" y="244" width="100" height="28" rx="4" fill="#dbe9f5"/>
<circle cx="100" cy="306" r="15" fill="#fff"/>
<rect x="50" y="342" width="100" height="28" rx="4" fill="#fff"/></g>
<text x="100" y="73" text-anchor="middle">conv1</text>
<text x="100" y="120" text-anchor="middle" fill="#fff" font-weight="600">bn1</text>
<text x="158" y="112" fill="#0b3d66" font-size="11">← the channel</text>
<text x="158" y="126" fill="#0b3d66" font-size="11">drawn below</text>
<text x="100" y="167" text-anchor="middle">ReLU</text>
<text x="100" y="215" text-anchor="middle">conv2</text>
<text x="100" y="263" text-anchor="middle">bn2</text>
<text x="100" y="312" text-anchor="middle" font-size="18">+</text>
<text x="100" y="361" text-anchor="middle">ReLU</text>
<text x="100" y="387" text-anchor="middle" fill="#444">to the next block</text>
<text x="300" y="170" fill="#444" transform="rotate(90 300 170)" text-anchor="middle">shortcut (identity)</text>
</svg>
"""

MARKDOWN = """\
# What batch normalization does in residual networks

{{ scope | md }}

{% for c in claims %}- **Claim {{ c.number }} — {{ c.badge_text }}.** {{ c.answer | md }} *Literature: {{ c.literature_short | md }}.* [More](#claim{{ c.number }})
{% endfor %}
{% if several %}
**Each claim in each setting:**

{{ settings_markdown }}
{% endif %}
{{ how_to_read | md }}

**Key numbers, with their intervals{% if several %} (in {{ setting_labels[0] }}, the first setting){% endif %}:**

{{ summary_markdown }}

<a id="steps"></a>

## What BN does, step by step

{{ steps_intro | md }}

![Where BN sits in a residual block](figures/bn_in_block.svg)

{% for s in steps_list %}{{ loop.index }}. {{ s | md }}
{% endfor %}
{% if steps %}
![{{ steps.figure.title }}]({{ steps.figure.path }})

*{{ steps.figure.title }}.* {{ steps.figure.caption | md }}

{{ steps.markdown }}
{% else %}
{{ steps_missing | md }}
{% endif %}
{% for c in claims %}
<a id="claim{{ c.number }}"></a>

## Claim {{ c.number }}: "{{ c.title }}" — {{ c.verdict }}

**Answer:** {{ c.answer | md }}
{% if c.verdict == "no verdict" %}
**No verdict:** {% if c.failed_runs %}{{ c.failed_runs }} run(s) of this claim failed (listed in the appendix; \
rerun the same `bnlab study` command to retry them){% elif c.error %}the analysis failed (the error is at the end of this \
section){% else %}too few seeds finished{% endif %}.
{% endif %}
{{ c.scope | md }}
{% if c.across | length > 1 %}
**In every setting — {{ c.robust.answer }}:** {{ c.robust.text | md }}.

{{ c.across_markdown }}
{% endif %}
{% if c.lead %}
![{{ c.lead.title }}]({{ c.lead.path }})

*{{ c.lead.title }}.* {{ c.lead.caption | md }}
{% endif %}
{% if c.evidence %}
**The evidence, part by part:**

{{ c.evidence_markdown }}
{% endif %}
{% for p in c.paragraphs %}
{{ p | md }}
{% endfor %}
**Literature:** {{ c.literature | md }} (its verdict: {{ c.expected }}; agrees with ours: {{ c.agrees }})
{% if c.agrees == "no" %}
**Why ours may differ, from what this run measured:**{% if c.differences %}
{% for d in c.differences %}
- {{ d | md }}
{%- endfor %}
{% else %} nothing measured here sets this setting apart; the caveats below name the differences of design.
{% endif %}{% endif %}
{% for f in c.figures %}
![{{ f.title }}]({{ f.path }})

*{{ f.title }}.* {{ f.caption | md }}
{% endfor %}
{% for t in c.tables %}
**{{ t.title | md }}**

{{ t.markdown }}
{% endfor %}
**How the verdict was reached.**
{% for p in c.parts %}
- {{ p | md }}
{%- endfor %}

**Verdict rule (fixed before the data):** {{ c.rule | md }}
{% if c.explanation_folded %}
{{ c.explanation | md }}
{% endif %}
{% for d in c.details %}
**{{ d.title | md }}.**
{% for p in d.paragraphs %}
{{ p | md }}
{% endfor %}{% endfor %}
**How this differs from the paper, and caveats.**
{% for caveat in c.caveats %}
- {{ caveat | md }}
{%- endfor %}
{% for t in c.folded_tables %}
**{{ t.title | md }}**

{{ t.markdown }}
{% endfor %}
{% if c.error %}
**This claim could not be analyzed:**

```text
{{ c.error }}
```
{% endif %}
{% endfor %}
<a id="glossary"></a>

## Glossary

{% for term, entry in glossary %}- **{{ term }}**: {{ entry.definition | md }}
{% endfor %}
<a id="appendix"></a>

## Appendix: configuration, versions, hardware

- Every figure and number: {{ run_info }}
- Store: `{{ store }}` ({{ run_counts | md }}); last run finished {{ study.last_run_finished or "n/a" }}
- Versions: {{ versions }}
- Hardware: {{ hardware }}
{% if failures %}- Failed runs (retried on the next `bnlab study` with the same arguments):
{% for f in failures %}  - `{{ f.label }}`: {{ f.error | md }}
{% endfor %}{% endif %}
Profile **{{ profile.name }}**{% if profile.description %}: {{ profile.description | md }}{% endif %}

```json
{{ profile_json }}
```
"""

HTML = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bnlab study: what batch normalization does in residual networks</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 72em; margin: 0.6em auto; padding: 0 1em; line-height: 1.45;
       color: #1a1a1a; overflow-wrap: break-word; }
h1 { font-size: 1.45em; margin: 0.2em 0 0.3em; line-height: 1.2; }
h2 { font-size: 1.25em; margin-top: 2em; }
p { max-width: 46em; }
.scope { color: #333; margin: 0.2em 0 0.6em; }
#summary { list-style: none; padding: 0; margin: 0.4em 0; }
.card { display: grid; grid-template-columns: 17em 1fr 17em; gap: 0.2em 1em; align-items: baseline;
        border-top: 1px solid #ddd; padding: 0.45em 0; }
.card .head { display: flex; flex-wrap: wrap; gap: 0.15em 0.5em; align-items: baseline; }
.card .claim-title { font-size: 0.88em; color: #333; }
.card .answer, .card .lit { margin: 0; }
.card .lit { font-size: 0.85em; color: #444; }
.card .across-text { grid-column: 2; font-size: 0.85em; color: #444; margin: 0; }
.claim > .answer { font-size: 1.08em; border-left: 4px solid #0072B2; padding: 0.2em 0.8em; }
.scroll { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { text-align: left; padding: 0.2em 0; }
#verdicts td:nth-child(5) { font-size: 0.92em; color: #333; }
#verdicts td:nth-child(n+2) { min-width: 8em; }
.badge { display: inline-block; padding: 0.05em 0.5em; border-radius: 0.8em; font-weight: 600; white-space: nowrap; }
/* white text on each: contrast ratio >= 4.5 (WCAG AA) */
.verdict-supported { background: #1b6e20; color: #fff; }
.verdict-partly-supported { background: #8a4b00; color: #fff; }
.verdict-not-supported { background: #b00020; color: #fff; }
.verdict-inconclusive { background: #4d4d4d; color: #fff; }
.verdict-no-verdict { background: #fff; color: #1a1a1a; border: 1px dashed #1a1a1a; }
.verdict-supported-with-caveats { background: #8a4b00; color: #fff; }
.verdict-depends-on-the-setting { background: #5a3d8a; color: #fff; }
.no-verdict { border-left: 3px solid #b00020; padding: 0.4em 1em; background: #fff5f5; }
figure { margin: 1.5em 0; } img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #444; max-width: 60em; }
.steps { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
.steps-text { flex: 1 1 24em; }
.diagram { flex: 0 1 320px; margin: 0.5em 0; } .diagram svg { max-width: 100%; height: auto; }
code { font-size: 0.92em; background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
details { margin: 0.6em 0; border-left: 3px solid #ccd; padding: 0.1em 0.9em; }
summary { cursor: pointer; font-weight: 600; color: #233; }
.rule { background: #f5f8ff; padding: 0.6em 1em; border-left: 3px solid #88a; }
dl.glossary dt { font-weight: 600; margin-top: 0.6em; } dl.glossary dd { margin-left: 1.2em; max-width: 46em; }
a { color: #0b57a4; } a.gloss { color: inherit; text-decoration: underline dotted #0b57a4; text-underline-offset: 2px; }
@media (max-width: 56em) {
  .card { grid-template-columns: 1fr; gap: 0.05em; padding: 0.3em 0; }
  .card .across-text { grid-column: 1; }
}
.narrow { display: none; }
@media (max-width: 30em) {
  body { padding: 0 0.7em; margin-top: 0.2em; line-height: 1.32; }
  h1 { font-size: 1.15em; margin: 0.1em 0 0.2em; }
  .scope, .card .answer { font-size: 0.9em; }
  .card .lit, .card .claim-title { font-size: 0.8em; }
  .card .wide { display: none; } .card .narrow { display: inline; }
}
</style></head><body>
<h1>What batch normalization does in residual networks</h1>
<p class="scope">{{ scope | rich }}</p>
<ol id="summary">
{% for c in claims %}<li class="card" id="answer{{ c.number }}"><div class="head"><a href="#claim{{ c.number }}">Claim
{{ c.number }}</a><span class="badge {{ c.card_css }}">{{ c.badge_text }}</span><span class="claim-title">{{ c.title }}</span></div>
<p class="answer">{{ c.answer | rich }}</p>
<p class="lit"><span class="wide">Literature: {{ c.literature_short | rich }}</span><span class="narrow">Literature —
{{ c.literature_brief | rich }}</span>{% if c.agrees != "—" %} · {{ "agrees" if c.agrees == "yes" else "disagrees"
}}<span class="wide"> with ours</span>{% endif %}</p>
{% if several %}<p class="across-text">{{ c.robust.text | rich }}</p>{% endif %}</li>
{% endfor %}</ol>
{% if several %}<div class="scroll"><table id="settings"><caption><b>Each claim in each setting</b></caption>
<tr><th>claim</th>{% for s in setting_labels %}<th>{{ s | rich }}</th>{% endfor %}<th>across them</th></tr>
{% for c in claims %}<tr><td><a href="#claim{{ c.number }}">{{ c.number }}</a></td>{% for a in c.across %}<td><span
class="badge {{ a.css }}">{{ a.verdict }}</span></td>{% endfor %}<td><span class="badge {{ c.robust_css }}">{{ c.robust.answer
}}</span></td></tr>{% endfor %}</table></div>{% endif %}
<p>{{ how_to_read | rich }} <a href="#steps">BN step by step</a> · <a href="#glossary">glossary</a> ·
<a href="#appendix">what was run</a>.</p>
<details id="key-numbers"><summary>Key numbers, with their intervals, and the literature's verdicts{% if several %} (in {{ setting_labels[0] | rich }}, the first setting){% endif %}</summary>
<div class="scroll"><table id="verdicts">
<tr><th>#</th><th>claim</th><th>verdict</th><th>key number [95% CI]</th><th>literature</th><th>agrees</th></tr>
{% for c in claims %}<tr><td>{{ c.number }}</td><td><a href="#claim{{ c.number }}">{{ c.title }}</a></td>
<td><span class="badge {{ c.css }}">{{ c.verdict }}</span></td><td>{{ c.key_number | rich }}</td>
<td>{{ c.literature_short | rich }}</td><td>{{ c.agrees }}</td></tr>
{% endfor %}</table></div></details>

<section id="steps">
<h2>What BN does, step by step</h2>
<div class="steps"><div class="steps-text">
<p>{{ steps_intro | rich }}</p>
<ol>{% for s in steps_list %}<li>{{ s | rich }}</li>{% endfor %}</ol>
{% if not steps %}<p class="no-verdict">{{ steps_missing | rich }}</p>{% endif %}
</div>
<figure class="diagram">{{ block_svg }}<figcaption>Where BN sits in a residual block of this study's networks. In a plain
network (claim 5) the shortcut is absent.</figcaption></figure></div>
{% if steps %}<figure><img id="bn-steps" alt="{{ steps.figure.title }}" src="data:image/png;base64,{{ steps.figure.base64 }}">
<figcaption><b>{{ steps.figure.title }}.</b> {{ steps.figure.caption | rich }}</figcaption></figure>
<div class="scroll"><table class="numbers"><caption><b>The channel's numbers</b></caption>
<tr>{% for col in steps.columns %}<th>{{ col }}</th>{% endfor %}</tr>
{% for row in steps.rows %}<tr>{% for cell in row %}<td>{{ cell | rich }}</td>{% endfor %}</tr>{% endfor %}
</table></div>{% endif %}
</section>
{% for c in claims %}
<section class="claim" id="claim{{ c.number }}">
<h2>Claim {{ c.number }}: “{{ c.title }}” — <span class="badge {{ c.css }}">{{ c.verdict }}</span></h2>
<p class="answer">{{ c.answer | rich }}</p>
{% if c.verdict == "no verdict" %}<p class="no-verdict"><b>No verdict:</b>
{% if c.failed_runs %}{{ c.failed_runs }} run(s) of this claim failed ({% if failures %}<a href="#failed-runs">listed
in the appendix</a>{% else %}listed in the store{% endif %}; rerun the same <code>bnlab study</code> command to retry
them){% elif c.error %}the analysis failed (the error is at the end of this section){% else %}too few seeds
finished{% endif %}.</p>{% endif %}
<p class="scope">{{ c.scope | rich }}</p>
{% if c.across | length > 1 %}<p><b>In every setting — <span class="badge {{ c.robust_css }}">{{ c.robust.answer }}</span>:</b>
{{ c.robust.text | rich }}.</p>
<div class="scroll"><table class="across"><tr><th>setting</th><th>verdict</th><th>key number</th><th>seeds</th></tr>
{% for a in c.across %}<tr><td>{{ a.setting | rich }}</td><td><span class="badge {{ a.css }}">{{ a.verdict }}</span></td>
<td>{{ a.key_number | rich }}</td><td>{{ a.seeds_text }}</td></tr>{% endfor %}</table></div>{% endif %}
{% if c.lead %}<figure><img alt="{{ c.lead.title }}" src="data:image/png;base64,{{ c.lead.base64 }}">
<figcaption><b>{{ c.lead.title }}.</b> {{ c.lead.caption | rich }}</figcaption></figure>{% endif %}
{% if c.evidence %}<div class="scroll"><table class="evidence"><caption><b>The evidence, part by part</b></caption>
<tr>{% for col in c.evidence_columns %}<th>{{ col | rich }}</th>{% endfor %}</tr>
{% for row in c.evidence %}<tr>{% for cell in row %}<td>{{ cell | rich }}</td>{% endfor %}</tr>{% endfor %}
</table></div>{% endif %}
{% for p in c.paragraphs %}<p>{{ p | rich }}</p>
{% endfor %}
<p><b>Literature:</b> {{ c.literature | rich }} (its verdict: {{ c.expected }}; agrees with ours: {{ c.agrees }})</p>
{% if c.agrees == "no" %}<div class="differs"><p><b>Why ours may differ, from what this run measured:</b>{% if c.differences %}</p>
<ul>{% for d in c.differences %}<li>{{ d | rich }}</li>{% endfor %}</ul>{% else %} nothing measured here sets this
setting apart; the caveats below name the differences of design.</p>{% endif %}</div>{% endif %}
{% for f in c.figures %}<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.base64 }}">
<figcaption><b>{{ f.title }}.</b> {{ f.caption | rich }}</figcaption></figure>
{% endfor %}
{% for t in c.tables %}<div class="scroll"><table><caption><b>{{ t.title | rich }}</b></caption>
<tr>{% for col in t.columns %}<th>{{ col | rich }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell | rich }}</td>{% endfor %}</tr>{% endfor %}
</table></div>
{% endfor %}
<details><summary>How the verdict was reached</summary>
{% if c.parts %}<ul class="parts">{% for p in c.parts %}<li>{{ p | rich }}</li>{% endfor %}</ul>{% endif %}
<p class="rule"><b>Verdict rule (fixed before the data):</b> {{ c.rule | rich }}</p>
{% if c.explanation_folded %}<p>{{ c.explanation | rich }}</p>{% endif %}
</details>
{% for d in c.details %}<details><summary>{{ d.title | rich }}</summary>
{% for p in d.paragraphs %}<p>{{ p | rich }}</p>{% endfor %}</details>
{% endfor %}
<details><summary>How this differs from the paper, and caveats</summary>
<ul>{% for caveat in c.caveats %}<li>{{ caveat | rich }}</li>{% endfor %}</ul>
{% for t in c.folded_tables %}<div class="scroll"><table><caption><b>{{ t.title | rich }}</b></caption>
<tr>{% for col in t.columns %}<th>{{ col | rich }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell | rich }}</td>{% endfor %}</tr>{% endfor %}
</table></div>
{% endfor %}</details>
{% if c.error %}<p><b>This claim could not be analyzed:</b></p><pre>{{ c.error }}</pre>{% endif %}
</section>
{% endfor %}
<section id="glossary">
<h2>Glossary</h2>
<dl class="glossary">{% for term, entry in glossary %}<dt id="gloss-{{ entry.slug }}">{{ term }}</dt>
<dd>{{ entry.definition | rich }}</dd>{% endfor %}</dl>
</section>
<section id="appendix">
<h2>Appendix: configuration, versions, hardware</h2>
<ul><li>Every figure and number: {{ run_info }}</li>
<li>Store: <code>{{ store }}</code> ({{ run_counts | rich }}); last run finished {{ study.last_run_finished or "n/a" }}</li>
<li>Versions: {{ versions }}</li><li>Hardware: {{ hardware }}</li>
{% if failures %}<li id="failed-runs">Failed runs (retried on the next <code>bnlab study</code> with the same arguments):<ul>
{% for f in failures %}<li><code>{{ f.label }}</code>: {{ f.error | rich }}</li>{% endfor %}</ul></li>{% endif %}
</ul>
<details><summary>Profile {{ profile.name }}: its description and every setting</summary>
{% if profile.description %}<p>{{ profile.description | rich }}</p>{% endif %}
<pre>{{ profile_json }}</pre></details>
</section>
</body></html>
"""
