"""The page: one HTML file, inline CSS, figures as data URIs, no script and nothing fetched."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>forethought report: {{ meta.model.name }}</title>
<style>
:root { --fg: #1d2330; --muted: #5d6678; --line: #dde2ea; --ok: #1f7a3d; --bad: #b3261e; --na: #7a6a1f; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 20px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 0 0 2px; }
.sub { color: var(--muted); margin: 0 0 16px; }
code, pre { font: 13px/1.45 ui-monospace, "SFMono-Regular", Menlo, monospace; }
pre { background: #eef1f5; padding: 8px 10px; border-radius: 6px; overflow-x: auto; white-space: pre-wrap;
      word-break: break-all; margin: 4px 0 0; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border-bottom: 1px solid var(--line); padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; margin: 16px 0; }
.question { color: var(--muted); font-style: italic; margin: 0 0 10px; }
.verdict { font-size: 16px; margin: 8px 0 12px; }
.badge { display: inline-block; font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 10px;
         color: #fff; vertical-align: middle; margin-left: 6px; }
.badge.ok { background: var(--ok); }
.badge.failed { background: var(--bad); } .badge.unavailable { background: var(--na); }
.reason { border-left: 3px solid var(--na); padding: 4px 10px; background: #fbf8ea; }
.failed .reason { border-color: var(--bad); background: #fbeceb; }
figure { margin: 14px 0 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.time { color: var(--muted); font-size: 13px; margin-top: 10px; }
nav ol { margin: 6px 0 0 0; padding-left: 22px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 0 24px; }
@media (max-width: 800px) { .grid { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<main>
<h1>What {{ meta.model.name }} carries from one token to the next</h1>
<p class="sub">{{ model_line }} · corpus <code>{{ meta.corpus }}</code> · {{ meta.mode }} run ·
{{ "%.0f"|format(total) }} s wall{% if meta.computed_seconds > total + 1 %} (sections computed in
{{ "%.0f"|format(meta.computed_seconds) }} s){% endif %} · {{ meta.started }}</p>

<section class="card" id="summary">
<h2>The questions</h2>
<nav><ol>
{% for s in sections %}
<li><a href="#{{ s.o.key }}">{{ s.o.title }}</a> <span class="badge {{ s.o.status }}">{{ s.status }}</span>
<span class="time">{{ s.time }}</span></li>
{% endfor %}
</ol></nav>
{% if meta.command %}
<p>Regenerate this page:</p>
<pre>{{ meta.command }}</pre>
{% endif %}
</section>

{% for s in sections %}
{% set o = s.o %}
<section class="card {{ o.status }}" id="{{ o.key }}" data-status="{{ o.status }}">
<h2>{{ o.title }} <span class="badge {{ o.status }}">{{ s.status }}</span></h2>
<p class="question">{{ o.question }}</p>
{% if o.finding %}
<p class="verdict">{{ o.finding.verdict }}</p>
{% if o.finding.numbers %}
<table class="numbers">
<tr><th>number</th><th>value</th>{% if o.finding.intervals %}<th>95% interval</th>{% endif %}</tr>
{% for name, value in o.finding.numbers.items() %}
<tr><td>{{ name }}</td><td class="num">{{ value|number }}</td>
{% if o.finding.intervals %}<td class="num">{{ o.finding.intervals.get(name)|interval }}</td>{% endif %}</tr>
{% endfor %}
</table>
{% endif %}
{% for f in s.figures %}
<figure>
<img src="{{ f.src }}" alt="{{ f.figure.caption }}">
<figcaption>{{ f.figure.caption }} Regenerate:</figcaption>
<pre>{{ f.figure.command }}</pre>
</figure>
{% endfor %}
{% set shown = s.figures|map(attribute="figure.command")|list %}
{% for c in o.finding.commands if c not in shown %}
{% if loop.first %}<p class="time">Numbers from:</p>{% endif %}
<pre>{{ c }}</pre>
{% endfor %}
{% else %}
<p class="reason"><strong>{{ s.status }}</strong>: {{ o.reason }}</p>
{% endif %}
<p class="time">{{ s.time }}</p>
</section>
{% endfor %}

<section class="card" id="machine">
<h2>Machine and versions</h2>
<div class="grid">
<table>
{% for k, v in meta.machine.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
<tr><th>model file</th><td><code>{{ meta.model.path }}</code></td></tr>
{% for k, v in meta.model.description.get("config", {}).items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
</table>
<table>
{% for k, v in meta.versions.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
{% for k, v in meta.settings.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
</table>
</div>
</section>
</main>
</body>
</html>
"""
