"""Jinja2 templates of the report: Markdown (with PNG files beside it) and self-contained HTML."""

MARKDOWN = """\
# bnlab study: what batch normalization does in residual networks

Profile **{{ profile.name }}** ({{ profile.description }}); seeds {{ profile.seeds }}; {{ run_counts }}.
Every number below is a mean over seeds with its 95% confidence interval in brackets.

| # | claim | verdict | key number [95% CI] | literature | agrees |
|---|---|---|---|---|---|
{% for c in claims -%}
| {{ c.number }} | {{ c.title }} | **{{ c.verdict.verdict }}** | {{ c.verdict.key_number }} | {{ c.literature_short }} | {{ c.agrees }} |
{% endfor %}
{% for c in claims %}
## Claim {{ c.number }}: "{{ c.title }}" — {{ c.verdict.verdict }}

{{ c.verdict.explanation }}

**Verdict rule (fixed before the data):** {{ c.rule }}

**Literature:** {{ c.literature }}
{% for f in c.figures %}
![{{ f.title }}]({{ f.path }})

*{{ f.title }}.* {{ f.caption }} {{ run_info }}
{% endfor %}
{% for t in c.tables %}
**{{ t.title }}**

| {{ t.columns | join(" | ") }} |
|{% for _ in t.columns %}---|{% endfor %}
{% for row in t.rows -%}
| {{ row | join(" | ") }} |
{% endfor %}
{% endfor %}
**Caveats.**
{% for caveat in c.caveats %}
- {{ caveat }}
{%- endfor %}
{% if c.error %}
**This claim could not be analyzed:** `{{ c.error }}`
{% endif %}
{% endfor %}
## Appendix: configuration, versions, hardware

- Store: `{{ store }}` ({{ run_counts }})
- Versions: {{ versions }}
- Hardware: {{ hardware }}
{% if failures %}- Failed runs (retried on the next `bnlab study` with the same arguments):
{% for f in failures %}  - `{{ f.label }}`: {{ f.error }}
{% endfor %}{% endif %}
Profile:

```json
{{ profile_json }}
```
"""

HTML = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>bnlab study: batch normalization in residual networks</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.supported { color: #176617; font-weight: bold; }
.not-supported { color: #a11; font-weight: bold; }
.supported-with-caveats { color: #a66a00; font-weight: bold; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.rule { background: #f5f8ff; padding: 0.6em 1em; border-left: 3px solid #88a; }
</style></head><body>
<h1>bnlab study: what batch normalization does in residual networks</h1>
<p>Profile <b>{{ profile.name }}</b> ({{ profile.description }}); seeds {{ profile.seeds }}; {{ run_counts }}.
Every number is a mean over seeds with its 95% confidence interval in brackets.</p>
<table><tr><th>#</th><th>claim</th><th>verdict</th><th>key number [95% CI]</th><th>literature</th><th>agrees</th></tr>
{% for c in claims %}<tr><td>{{ c.number }}</td><td><a href="#claim{{ c.number }}">{{ c.title }}</a></td>
<td class="{{ c.verdict.verdict | replace(' ', '-') }}">{{ c.verdict.verdict }}</td><td>{{ c.verdict.key_number }}</td>
<td>{{ c.literature_short }}</td><td>{{ c.agrees }}</td></tr>
{% endfor %}</table>
{% for c in claims %}
<h2 id="claim{{ c.number }}">Claim {{ c.number }}: “{{ c.title }}” —
<span class="{{ c.verdict.verdict | replace(' ', '-') }}">{{ c.verdict.verdict }}</span></h2>
<p>{{ c.verdict.explanation }}</p>
<p class="rule"><b>Verdict rule (fixed before the data):</b> {{ c.rule }}</p>
<p><b>Literature:</b> {{ c.literature }}</p>
{% for f in c.figures %}<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.base64 }}">
<figcaption><b>{{ f.title }}.</b> {{ f.caption }} {{ run_info }}</figcaption></figure>
{% endfor %}
{% for t in c.tables %}<table><caption><b>{{ t.title }}</b></caption>
<tr>{% for col in t.columns %}<th>{{ col }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endfor %}
<p><b>Caveats.</b></p><ul>{% for caveat in c.caveats %}<li>{{ caveat }}</li>{% endfor %}</ul>
{% if c.error %}<p><b>This claim could not be analyzed:</b> <code>{{ c.error }}</code></p>{% endif %}
{% endfor %}
<h2>Appendix: configuration, versions, hardware</h2>
<ul><li>Store: <code>{{ store }}</code> ({{ run_counts }})</li><li>Versions: {{ versions }}</li>
<li>Hardware: {{ hardware }}</li>
{% if failures %}<li>Failed runs (retried on the next <code>bnlab study</code> with the same arguments):<ul>
{% for f in failures %}<li><code>{{ f.label }}</code>: {{ f.error }}</li>{% endfor %}</ul></li>{% endif %}
</ul>
<p>Profile:</p><pre>{{ profile_json }}</pre>
</body></html>
"""
