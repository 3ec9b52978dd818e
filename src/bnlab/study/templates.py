"""Jinja2 templates of the report: Markdown (with PNG files beside it) and self-contained HTML.

Claim text goes through ``md`` (Markdown) or ``rich`` (HTML) so `code` and references render as code and
links; every Markdown table is built by :func:`bnlab.study.report.md_cell` (pre-rendered as ``.markdown``).
What was run (dataset, model, seeds, versions, hardware) is stated once, in the appendix; figures keep
their own captions.
"""

MARKDOWN = """\
# bnlab study: what batch normalization does in residual networks

Profile **{{ profile.name }}** ({{ profile.description | md }}); seeds {{ study.seeds }}; {{ run_counts | md }}.
Every number below is a mean over seeds with its 95% confidence interval in brackets; what was run is in the
[appendix](#appendix-configuration-versions-hardware).

{{ summary_markdown }}
{% for c in claims %}
## Claim {{ c.number }}: "{{ c.title }}" — {{ c.verdict }}
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
{{ c.explanation | md }}
{% if c.parts %}
{% for p in c.parts %}- {{ p | md }}
{% endfor %}{% endif %}
**Verdict rule (fixed before the data):** {{ c.rule | md }}

**Literature:** {{ c.literature | md }} (its verdict: {{ c.expected }}; agrees with ours: {{ c.agrees }})
{% for f in c.figures %}
![{{ f.title }}]({{ f.path }})

*{{ f.title }}.* {{ f.caption | md }}
{% endfor %}
{% for t in c.tables %}
**{{ t.title | md }}**

{{ t.markdown }}
{% endfor %}
**Caveats.**
{% for caveat in c.caveats %}
- {{ caveat | md }}
{%- endfor %}
{% if c.error %}
**This claim could not be analyzed:**

```text
{{ c.error }}
```
{% endif %}
{% endfor %}
## Appendix: configuration, versions, hardware

- Every figure and number: {{ run_info }}
- Store: `{{ store }}` ({{ run_counts | md }}); last run finished {{ study.last_run_finished or "n/a" }}
- Versions: {{ versions }}
- Hardware: {{ hardware }}
{% if failures %}- Failed runs (retried on the next `bnlab study` with the same arguments):
{% for f in failures %}  - `{{ f.label }}`: {{ f.error | md }}
{% endfor %}{% endif %}
Profile:

```json
{{ profile_json }}
```
"""

HTML = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bnlab study: batch normalization in residual networks</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 72em; margin: 1em auto; padding: 0 1em; line-height: 1.45;
       color: #1a1a1a; overflow-wrap: break-word; }
h1 { font-size: 1.5em; margin: 0.4em 0; }
h2 { font-size: 1.25em; margin-top: 2em; }
.scroll { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { text-align: left; padding: 0.2em 0; }
#summary td:nth-child(5) { font-size: 0.92em; color: #333; }
#summary td:nth-child(n+2) { min-width: 8em; }
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
figcaption { font-size: 0.85em; color: #444; }
code { font-size: 0.92em; background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.rule { background: #f5f8ff; padding: 0.6em 1em; border-left: 3px solid #88a; }
a { color: #0b57a4; }
</style></head><body>
<h1>bnlab study: what batch normalization does in residual networks</h1>
<p>Profile <b>{{ profile.name }}</b> ({{ profile.description | rich }}); seeds {{ study.seeds }};
{{ run_counts | rich }}. Numbers are means over seeds with 95% confidence intervals in brackets;
what was run is in the <a href="#appendix">appendix</a>.</p>
<div class="scroll"><table id="summary">
<tr><th>#</th><th>claim</th><th>verdict</th><th>key number [95% CI]</th><th>literature</th><th>agrees</th></tr>
{% for c in claims %}<tr><td>{{ c.number }}</td><td><a href="#claim{{ c.number }}">{{ c.title }}</a></td>
<td><span class="badge {{ c.css }}">{{ c.verdict }}</span></td><td>{{ c.key_number | rich }}</td>
<td>{{ c.literature_short | rich }}</td><td>{{ c.agrees }}</td></tr>
{% endfor %}</table></div>
{% for c in claims %}
<h2 id="claim{{ c.number }}">Claim {{ c.number }}: “{{ c.title }}” —
<span class="badge {{ c.css }}">{{ c.verdict }}</span></h2>
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
<p>{{ c.explanation | rich }}</p>
{% if c.parts %}<ul class="parts">{% for p in c.parts %}<li>{{ p | rich }}</li>{% endfor %}</ul>{% endif %}
<p class="rule"><b>Verdict rule (fixed before the data):</b> {{ c.rule | rich }}</p>
<p><b>Literature:</b> {{ c.literature | rich }} (its verdict: {{ c.expected }}; agrees with ours: {{ c.agrees }})</p>
{% for f in c.figures %}<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.base64 }}">
<figcaption><b>{{ f.title }}.</b> {{ f.caption | rich }}</figcaption></figure>
{% endfor %}
{% for t in c.tables %}<div class="scroll"><table><caption><b>{{ t.title | rich }}</b></caption>
<tr>{% for col in t.columns %}<th>{{ col | rich }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell | rich }}</td>{% endfor %}</tr>{% endfor %}
</table></div>
{% endfor %}
<p><b>Caveats.</b></p><ul>{% for caveat in c.caveats %}<li>{{ caveat | rich }}</li>{% endfor %}</ul>
{% if c.error %}<p><b>This claim could not be analyzed:</b></p><pre>{{ c.error }}</pre>{% endif %}
{% endfor %}
<h2 id="appendix">Appendix: configuration, versions, hardware</h2>
<ul><li>Every figure and number: {{ run_info }}</li>
<li>Store: <code>{{ store }}</code> ({{ run_counts | rich }}); last run finished {{ study.last_run_finished or "n/a" }}</li>
<li>Versions: {{ versions }}</li><li>Hardware: {{ hardware }}</li>
{% if failures %}<li id="failed-runs">Failed runs (retried on the next <code>bnlab study</code> with the same arguments):<ul>
{% for f in failures %}<li><code>{{ f.label }}</code>: {{ f.error | rich }}</li>{% endfor %}</ul></li>{% endif %}
</ul>
<p>Profile:</p><pre>{{ profile_json }}</pre>
</body></html>
"""
