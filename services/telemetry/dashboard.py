"""The one-page dashboard served at `/`: the service graph's edges, refreshed every
two seconds from `/api/graph` (no build step, no external assets)."""

from __future__ import annotations

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Meshwork telemetry</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
  table { border-collapse: collapse; min-width: 60em; }
  th, td { padding: .35em .8em; border-bottom: 1px solid #ddd; text-align: right; }
  th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
  .bad { color: #b00; font-weight: 600; }
  .muted { color: #888; }
</style>
</head>
<body>
<h1>Meshwork telemetry</h1>
<p>Window <select id="window">
  <option value="10">10 s</option><option value="60" selected>1 min</option>
  <option value="300">5 min</option><option value="600">10 min</option>
</select> <span id="status" class="muted"></span></p>
<table>
  <thead><tr><th>Source</th><th>Destination</th><th>Requests/s</th><th>Success</th>
  <th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>Reporter</th></tr></thead>
  <tbody id="edges"></tbody>
</table>
<p class="muted">Also: <a href="/metrics">/metrics</a> · <a href="/api/graph">/api/graph</a> ·
<a href="/api/traces">/api/traces</a> · <a href="/api/access">/api/access</a></p>
<script>
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fmt(v) { return v === null || v === undefined ? "-" : v.toFixed(1); }
async function refresh() {
  const w = document.getElementById("window").value;
  try {
    const r = await fetch("/api/graph?window=" + w);
    const g = await r.json();
    const body = document.getElementById("edges");
    body.replaceChildren();
    for (const e of g.edges) {
      const tr = document.createElement("tr");
      tr.append(
        cell(e.source + "." + e.source_namespace),
        cell(e.destination + "." + e.destination_namespace),
        cell(e.rps.toFixed(2)),
        cell((e.success_rate * 100).toFixed(2) + " %", e.success_rate < 0.99 ? "bad" : ""),
        cell(fmt(e.p50_ms)), cell(fmt(e.p90_ms)), cell(fmt(e.p99_ms)),
        cell(e.reporter, "muted"));
      body.append(tr);
    }
    document.getElementById("status").textContent =
      g.edges.length + " edges, updated " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("status").textContent = "unreachable: " + err;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""
